"""`preloaded.Executor`: concurrent.futures on warm children, and the child's half."""
