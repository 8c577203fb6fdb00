"""The inference service (`make serve`): FastAPI app, batching engine, Prometheus metrics, load test."""
