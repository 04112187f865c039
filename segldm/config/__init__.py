"""Config plumbing below everything else: OmegaConf resolvers and the run-folder rule."""
