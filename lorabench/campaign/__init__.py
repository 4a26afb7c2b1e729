"""The GPU validation campaign in one command: plan (priority order), clock, resumable runner."""
