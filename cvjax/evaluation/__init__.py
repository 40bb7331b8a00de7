"""cvjax.evaluation."""
