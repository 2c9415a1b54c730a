"""Privacy at the coordinator: the DP ledger (epsilon per site), site-level DP wrappers and SecAgg+."""
