"""The storage stack: the `Storage` protocol, layers and base stores."""
