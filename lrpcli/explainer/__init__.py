"""From a spec to attributions: model and data loading, the one ``Explainer``, the library API, export."""
