SELECT now() - $1::interval AS cutoff
