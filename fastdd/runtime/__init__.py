"""What a run needs from the machine it runs on: its memory plan, the allocator's settings, the processes it is
split over, folder locks and the precision of its passes over real images."""
