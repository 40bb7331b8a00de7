"""cvjax.tasks."""
