"""HTTP routes: thin functions over :mod:`service.scheduler` and friends."""
