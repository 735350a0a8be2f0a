"""The worker runtime, one step a module: fetcher -> scheduler -> executor -> classify ->
settle, with the InFlight table and the lease loop beside them."""
