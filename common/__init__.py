"""Code shared by the ServerApp and the ClientApp: configuration, model, data, features, training."""
