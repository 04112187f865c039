"""What every entry point runs around a job: start-up checks, checkpoint loading, resume, pre-emption, DDP launch."""
