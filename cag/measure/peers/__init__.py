"""Other inference engines, run on the same model file and inputs as cag for comparison."""
