"""cvjax.data."""
