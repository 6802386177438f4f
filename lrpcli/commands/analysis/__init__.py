"""Dataset-wide analysis of explain output: SpRAy (``lrpcli analyze``) and ViRelAy projects (``lrpcli virelay``).

Modules: ``spray`` (the numerics, pure functions), ``source`` (reading an explain file), ``layout`` (ViRelAy's
analysis HDF5 layout), ``analyze`` (the analyze pipeline), ``project`` (the ViRelAy folder), ``command`` (click).
"""
