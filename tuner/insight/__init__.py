"""Reading a study: reports, comparisons, verification, the dashboard and export."""
