"""The dashboard at `/`: the box, the models, live serving, a playground and the planner, in one page
(static/, no build step, no CDN) over the JSON routes of api_router.py and the API's own routes."""
