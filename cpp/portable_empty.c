/* An empty translation unit: the body of a CPU variant the portable build does not ship. */
