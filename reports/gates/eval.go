NO-GO (overridden)
