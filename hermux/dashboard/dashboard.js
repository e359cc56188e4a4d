// hermux dashboard
