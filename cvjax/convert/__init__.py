"""cvjax.convert."""
