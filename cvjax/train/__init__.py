"""cvjax.train."""
