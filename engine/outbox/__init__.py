"""Where a result is published: attempt folders and their renaming into place (`folders`),
result.json and summary.json after every commit that ends something (`results`), PNGs with their
parameters (`png`) and contact sheets (`sheets`)."""
