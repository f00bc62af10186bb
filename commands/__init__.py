"""One module per `esper` subcommand. Thin: options in, a domain call, the result rendered."""
