"""Engine-neutral training pieces: learning-rate schedules, optimizer parameter groups."""
