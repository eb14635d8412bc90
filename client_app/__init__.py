"""The FedCLIP ClientApp."""
