"""The FedCLIP ServerApp: discovery of the nodes' domains, the round loop and the run's outputs."""
