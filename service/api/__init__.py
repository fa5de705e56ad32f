"""HTTP routes: thin functions over :mod:`service.runtime.scheduler` and friends."""
