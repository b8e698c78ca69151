"""The chaos suite: real scenarios on real components, with injected faults (`make chaos`)."""
