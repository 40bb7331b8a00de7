"""FCN (Long et al. 2015) -- being written."""
