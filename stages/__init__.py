"""Ray Data stages: a pure array function at the core of each module, a thin batch adapter around it."""
