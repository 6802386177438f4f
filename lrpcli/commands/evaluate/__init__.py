"""``lrpcli evaluate``: how faithful, localised and compact the stored attributions are, measured per sample.

``metrics`` holds the published formulas as pure numpy functions, ``settings`` the torch-free metric names and
settings (all that ``--help`` needs), ``perturb`` the batched perturbation forwards, ``source`` reads a result
file and rebuilds its model, ``cache`` keeps per-sample values in the file's ``evaluation/`` group, ``run`` ties
them together per file, ``report`` and ``plot`` present the results and ``command`` is the click command.
"""
