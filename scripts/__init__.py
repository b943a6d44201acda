"""vlkit's host-side tools (the `vlkit` CLI): planner, doctor, up/down. No torch here."""
