"""``lrpcli debug``: rule assignment, per-layer conservation and diagnoses for one config or a stored run.

``collect`` runs the model (torch), ``stats`` reduces per-sample numbers to mean and worst (model runs and stored
runs alike), ``diagnose`` turns them into lines naming layers, ``format`` prints them, ``command`` is the CLI.
Nothing is imported here, so ``lrpcli --help`` does not pay for numpy or torch.
"""
