"""cvjax.viz."""
