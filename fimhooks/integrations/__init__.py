"""Callbacks for training loops the user does not own (they use ``FisherMonitor.start``)."""
