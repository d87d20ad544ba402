SELECT commandbus.refresh_statistics_v1() AS analyzed
