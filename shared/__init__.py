"""pdserve.shared: what every role uses: args, protocol, models, the engine."""
