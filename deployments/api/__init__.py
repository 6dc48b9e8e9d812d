"""The HTTP layer: one module per API dialect (``native``, ``openai``, ``a1111``), each its
protocol and its mapping onto one neutral ``Generation``; ``serving`` fans a generation out over
the stages; ``ingress`` is the Serve deployment that builds the FastAPI app on each replica."""
