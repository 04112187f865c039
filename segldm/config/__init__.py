"""Config plumbing below everything else: OmegaConf resolvers, the run-folder rule, and the
constructor helpers components check their own configs with."""
