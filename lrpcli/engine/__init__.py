"""The LRP engine: rules, the hooks that install them, canonizers and composites. Pure: it imports nothing above
it (spec, explainer, store, runner, commands)."""
