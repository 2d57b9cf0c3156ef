"""phizer: serves every image of a site at the sizes its pages need, resized on the fly."""
