"""What a study is: study files, the search space, params files, settings, samplers and pruners."""
