"""The bilevel engine: SearchModel, the architects, DARTS's updates and schedules, the
remedies and DARTS-PT's selection."""
