"""Everything about the router and the gates, one job per module:

    router.py    the math: gates from logits, the balance and guide losses, running statistics
    context.py   RoutingContext: one forward's routing inputs (masks, forced gates, labels)
                 and outputs (loss terms, statistics, kept gates); the layers hold none of it
    stats.py     what the gates do over a data set, and how different the heads are
    labels.py    the head each example stands for (oracle routing, the guide loss)
    fixed.py     fixed gate vectors (uniform, mean, per domain, from a file) for merge and export
    requests.py  request routing for serving: which exported adapter answers a prompt

This file imports nothing, so that importing one of them does not import the others (they
sit on different layers of the package; see docs/design.md).
"""
