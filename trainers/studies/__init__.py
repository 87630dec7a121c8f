"""Studies: scripted sets of training runs whose tables the docs quote (each module says which page)."""
