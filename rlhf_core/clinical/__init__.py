"""Clinical knowledge and checks: the case format and loaders, the diagnosis verifier, the
safety checker and its knowledge table, the pass over uploaded values. No torch."""
