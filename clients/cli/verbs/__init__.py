"""One module per resource; each verb is a plain function cyclopts registers lazily."""
