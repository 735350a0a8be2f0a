"""The job runtime, one step a module: fetcher -> scheduler -> jobs (executor -> outcome ->
settle), with the InFlight table, the lease loop and the shutdown beside them; policy makes
every decision (pure), clock and backoff are the time it runs on."""
