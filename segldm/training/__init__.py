"""Lightning modules that train the two stages, and what runs beside them: callbacks, LR schedules, guards."""
