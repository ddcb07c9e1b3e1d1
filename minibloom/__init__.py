"""minibloom: BLOOM/BLOOMZ and mT5/mT0 from scratch."""
