"""The swarm client: discover providers in the DHT, route over their spans, and run
inference and training through chains of them (imports torch and hivemind)."""
