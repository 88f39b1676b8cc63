"""stepup-gateway: an authentication reverse proxy that adds OpenID Connect step-up."""

__version__ = "0.1.0"
